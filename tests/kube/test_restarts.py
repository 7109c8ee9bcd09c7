"""Restart semantics (issue 13): the restartPolicy `auto` chooses per step, every step pod starts under
clusterfit.launch, and the controller stops what the training operator v1.9 would retry forever.

The oracles are the operator's own rules (pkg/controller.v1/common/pod.go, pkg/core/job.go at v1.9):
under ExitCode a pod that exits with 128 or more is deleted and recreated, any other code fails the job;
backoffLimit sums restartCount of running pods only, which a recreated pod (restartPolicy Never) never
raises. The pod lists below are what the API server showed, poll after poll, in such loops.
"""

from __future__ import annotations

from typing import Any

import pytest

from clusterfit.config import STEPS, config_from_args
from clusterfit.kube.manifests import build_step_job, restart_policy
from clusterfit.kube.status import Retries, exit_events, oom_hint, retry_problem

EXAMPLE = ["config=kubernetes-example"]
TWO_PODS = [*EXAMPLE, "config.DISTRIBUTED.NUM_NODES=2"]


def policies(args: list[str]) -> dict[str, set[str]]:
    cfg = config_from_args(args)
    jobs = {step: build_step_job(cfg, step, config_map_name="c") for step in STEPS}
    return {
        step: {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} for step, job in jobs.items()
    }


def test_auto_retries_preemption_and_fails_a_real_error_at_once_where_a_lost_pod_fails_nobody() -> None:
    assert config_from_args(EXAMPLE).KUBERNETES.RESTART_POLICY == "auto"
    assert policies(EXAMPLE) == {step: {"ExitCode"} for step in STEPS}  # one pod per job
    # Several pods: a lost pod makes its torch peers exit 1, which must be retried; cluster's ranks meet in storage.
    assert policies(TWO_PODS) == {step: {"ExitCode" if step == "cluster" else "OnFailure"} for step in STEPS}
    assert policies([*TWO_PODS, "config.KUBERNETES.RESTART_POLICY=ExitCode"]) == {s: {"ExitCode"} for s in STEPS}
    assert restart_policy(config_from_args([*EXAMPLE, "config.KUBERNETES.RESTART_POLICY=Never"]), "train") == "Never"


def pod(uid: str, state: dict[str, Any], last: dict[str, Any] | None = None, restarts: int = 0) -> dict[str, Any]:
    status = {"name": "pytorch", "restartCount": restarts, "state": state, "lastState": last or {}}
    return {"metadata": {"name": "fit-extract-master-0", "uid": uid}, "status": {"containerStatuses": [status]}}


RUNNING = {"running": {}}
OOM = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}


def first_problem(polls: list[list[dict[str, Any]]], backoff_limit: int = 2) -> tuple[int, str]:
    """(poll index, message) of the first poll after which the controller stops the step; (-1, "") if none."""
    retries = Retries()
    for i, pods in enumerate(polls):
        retries.see(pods)
        problem = retry_problem("extract", pods, retries, backoff_limit, "200Mi")
        if problem:
            return i, problem
    return -1, ""


def test_a_pod_recreated_more_often_than_the_backoff_limit_stops_the_step() -> None:
    # ExitCode: each incarnation dies between two polls and the operator recreates it (a new uid).
    polls = [[pod(uid, RUNNING)] for uid in ("a", "a", "b", "c", "c", "d", "e")]
    index, problem = first_problem(polls)
    print(problem)
    assert index == 5  # the third recreation is one more than BACKOFF_LIMIT=2
    assert "retried 3 times (3 recreated by the operator, 0 restarted in place)" in problem
    assert "KUBERNETES.BACKOFF_LIMIT=2" in problem
    # In-place restarts (OnFailure) count too; a pod that keeps running is left alone.
    assert first_problem([[pod("a", RUNNING, restarts=n)] for n in (0, 1, 2, 3)])[0] == 3
    assert first_problem([[pod("a", RUNNING)]] * 20) == (-1, "")


@pytest.mark.parametrize("where", ["state", "lastState"])
def test_an_oomkilled_container_stops_the_step_at_once_naming_the_memory_key(where: str) -> None:
    seen = pod("b", OOM) if where == "state" else pod("a", RUNNING, last=OOM, restarts=1)
    index, problem = first_problem([[pod("a", RUNNING)], [seen]], backoff_limit=5)
    print(problem)
    assert index == 1
    assert "container pytorch was OOMKilled" in problem and "KUBERNETES.RESOURCES.EXTRACT.MEMORY=200Mi" in problem
    # Killed by the grace period's SIGKILL (reason Error): a retry, not an OOM.
    assert first_problem([[pod("b", {"terminated": {"exitCode": 137, "reason": "Error"}})]]) == (-1, "")


def test_the_operators_exit_events_are_reported_with_a_hint_for_137() -> None:
    events = [
        {"reason": "ExitedWithCode", "message": "Pod: ns.fit-extract-master-0 exited with code 137"},
        {"reason": "ExitedWithCode", "message": "Pod: ns.fit-extract-master-0 exited with code 143"},
        {"reason": "SuccessfulCreatePod", "message": "Created pod: fit-extract-master-0"},
    ]
    for event in events:
        event["involvedObject"] = {"name": "fit-extract"}
    assert exit_events(events, oom_hint("extract", "200Mi")) == [
        "event on fit-extract: Pod: ns.fit-extract-master-0 exited with code 137 "
        "(SIGKILL: OOMKilled, most likely; KUBERNETES.RESOURCES.EXTRACT.MEMORY=200Mi)",
        "event on fit-extract: Pod: ns.fit-extract-master-0 exited with code 143",
    ]
