"""The controller saves the step pods' logs while the step runs, so they outlive the pods: on the default path
(restartPolicy OnFailure, cleanPodPolicy Running) the operator deletes a failed job's running pods together with
the Failed condition, and their logs with them.

Oracles: the text the fake kubelet served (the crashed container's log and the current one's), the saved copy in
the store, the failure report on stderr and what `clusterfit logs` prints once the pod is gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clusterfit.kube import commands
from clusterfit.kube.client import last_bytes
from clusterfit.kube.pod_logs import RESTART_MARK
from clusterfit.storage import open_store
from tests.infra.controlplane import ControlPlane
from tests.kube.helpers_controller import Experiment, FakeKubelet, FakeOperator, Script, container_status
from tests.s3server import S3Server


@pytest.fixture
def ex(control_plane: ControlPlane, namespace: str, s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> Experiment:
    return Experiment(control_plane, namespace, tmp_path, f"{s3_bucket}/runs", s3_env.endpoint_url)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_last_bytes_keeps_the_end_from_a_line_start_and_says_what_it_left_out() -> None:
    lines = [f"line {i:05d}\n".encode() for i in range(10_000)]  # 11 bytes each
    chunks = [b"".join(lines[i : i + 37]) for i in range(0, len(lines), 37)]  # chunks that cut no line
    kept = last_bytes(chunks, 1000)
    marker, _, rest = kept.partition("\n")
    assert rest == b"".join(lines[-(1000 // 11) :]).decode()  # whole lines only: 90 of them, 990 bytes
    assert marker == f"[... {11 * (10_000 - 1000 // 11)} earlier bytes left out ...]"
    assert last_bytes([b"short\n", b"log\n"], 1000) == "short\nlog\n"
    assert last_bytes([b"x" * 5000], 1000) == "[... 4000 earlier bytes left out ...]\n" + "x" * 1000  # one long line


@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
def test_a_pods_log_is_saved_while_it_runs_and_outlives_its_deletion_with_the_failed_condition(
    ex: Experiment, capsys: pytest.CaptureFixture[str], restarted: bool
) -> None:
    """The master pod runs (a worker failed the job), or runs again after its container crashed (OnFailure)."""
    config, cfg = ex.config(steps=["cluster", "train"], POD_CHECK_INTERVAL_S=1, LOG_SAVE_INTERVAL_S=1)
    pod = "fit-cluster-master-0"
    crashed = "".join(f"epoch {i}\n" for i in range(3)) + "RuntimeError: NCCL watchdog timeout\n"
    current = "resuming from checkpoint e0002\n"
    expected = crashed + RESTART_MARK + current if restarted else current
    status = container_status("clusterfit:test", {"running": {}}, restarts=int(restarted))
    if restarted:
        status["lastState"] = {"terminated": {"exitCode": 1, "reason": "Error"}}
    failed = ("PyTorchJobFailed", "PyTorchJob fit-cluster is failed because 1 Worker replica(s) failed.")
    script = Script(
        fail=failed,
        hold=threading.Event(),
        log=current,
        pod_status={"phase": "Running", "containerStatuses": [status]},
        delete_pods=True,  # cleanPodPolicy Running: the pod, and its log, go with the Failed condition
    )
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    saved = f"logs/cluster/{pod}.log"

    def saved_text() -> str:
        return store.get_bytes(saved).decode() if store.exists(saved) else ""

    with FakeKubelet(ex.cp) as kubelet, FakeOperator(ex, cfg, {"cluster": script}, kubelet) as operator:
        key = f"{ex.namespace}/{pod}/pytorch"
        if restarted:
            kubelet.previous_logs[key] = crashed
        thread, result = ex.submit_in_background(config)
        assert script.running.wait(timeout=60)
        wait_for(lambda: saved_text() == expected, "the log saved mid-run")
        kubelet.logs[key] = current + "epoch 3\n"  # the running container writes on
        wait_for(lambda: saved_text().endswith("epoch 3\n"), "the next save, while the step still runs")
        mid_run = saved_text()
        assert script.hold is not None
        script.hold.set()  # the operator deletes the pod, then marks the job Failed
        thread.join(timeout=60)

    assert result == [1]
    assert operator.names() == ["fit-cluster"]
    assert mid_run == expected + "epoch 3\n"
    err = capsys.readouterr().err
    report = err[err.index("step cluster failed: PyTorchJob fit-cluster") :]
    assert "last 50 lines of pod fit-cluster-master-0:" in report
    shown = ["epoch 2", "RuntimeError: NCCL watchdog timeout"] if restarted else []
    for line in [*shown, "resuming from checkpoint e0002", "epoch 3"]:
        assert f"\n    {line}\n" in report + "\n", line
    assert "(no pods left to show a log from)" not in report
    assert saved_text() == mid_run

    # `clusterfit logs` finds the pod gone and prints the saved copy (all of it, or its --tail).
    base = [f"config={config}", "--kubeconfig", str(ex.cp.kubeconfig_path), "cluster"]
    assert commands.cli_logs(base) == 0
    printed = capsys.readouterr()
    assert printed.out == mid_run
    assert f"pod {pod} is gone; its log as the controller saved it at " in printed.err
    assert commands.cli_logs([*base, "--tail", "2"]) == 0
    assert capsys.readouterr().out == current + "epoch 3\n"
    print(f"saved mid-run and printed by `clusterfit logs` after the pod was deleted:\n{mid_run}", end="")


def test_a_chatty_pods_log_is_kept_to_its_last_log_max_bytes(ex: Experiment) -> None:
    config, cfg = ex.config(steps=["cluster"], LOG_MAX_BYTES=1024)
    log = "".join(f"k-means iteration {i:06d}\n" for i in range(20_000))  # 500 kB, 25 bytes a line
    with FakeKubelet(ex.cp) as kubelet, FakeOperator(ex, cfg, {"cluster": Script(log=log)}, kubelet):
        assert ex.submit(config) == 0
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    saved = store.get_bytes("logs/cluster/fit-cluster-master-0.log").decode()
    marker, _, kept = saved.partition("\n")
    assert kept == log[-(1024 // 25) * 25 :]  # the whole last lines that fit
    assert marker == f"[... {len(log) - len(kept)} earlier bytes left out ...]"
