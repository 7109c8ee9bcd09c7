"""The controller against a real kube-apiserver: the tests play the training operator (patching each
job's /status from a background thread) and a kubelet that serves pod logs, then check what the
controller created, in which order, what it reported and what it saved.

Oracles: the order of creation comes from etcd revisions (one etcd, so resourceVersions are one
global sequence: a job created after its predecessor's Succeeded patch has a larger one), the
job count per name from the operator's record of uids, the Role from k8s/controller-rbac.yaml.
"""

from __future__ import annotations

import logging
import os
import pty
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from clusterfit.config import config_from_args
from clusterfit.kube import commands
from clusterfit.kube.client import GROUP, PLURAL, VERSION, Kube
from clusterfit.kube.controller import Controller, ControllerError, plan
from clusterfit.kube.manifests import build_config_map, job_name
from clusterfit.kube.status import start_problems, verdict
from clusterfit.storage import open_store
from tests.infra.controlplane import ControlPlane
from tests.kube.helpers_controller import (
    ALL_STEPS,
    EXPECTED_RULES,
    Experiment,
    FakeKubelet,
    FakeOperator,
    Script,
    committed_role_rules,
    container_status,
    grant_controller_role,
    normalized_rules,
    oom_restarted,
    used_rules,
    write_config,
)
from tests.s3server import S3Server

ARGS = "config=/etc/clusterfit/config.yaml"


@pytest.fixture
def ex(control_plane: ControlPlane, namespace: str, s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> Experiment:
    """A fresh namespace and bucket; the S3 credentials are in the environment, as in a pod."""
    return Experiment(control_plane, namespace, tmp_path, f"{s3_bucket}/runs", s3_env.endpoint_url)


def container_args(job: dict[str, Any]) -> str:
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return " ".join([*(container.get("command") or []), *(container.get("args") or [])])


def start_submit(command: list[str], ex: Experiment, stdin: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """`clusterfit submit` in the background, stderr piped, stdout to `stdin`'s terminal when it is one.

    The child gets SIGINT's default disposition: a test run started in the background by a
    non-interactive shell (`.ci/run &`) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so a Ctrl-C test would wait forever."""
    return subprocess.Popen(
        command,
        cwd=ex.folder,
        stdin=stdin,
        stdout=stdin if stdin != subprocess.DEVNULL else None,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def read_until(process: subprocess.Popen[str], text: str, timeout_s: float = 60) -> str:
    """The process's stderr up to the line containing `text` (fails if it ends or times out first)."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in lines):
        line = process.stderr.readline()
        assert line and time.monotonic() < deadline, f"never saw {text!r}:\n{''.join(lines)}"
        lines.append(line)
    return "".join(lines)


def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- pure decisions, from recorded status sequences -------------------------------------------


def job_with(*conditions: tuple[str, str]) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": t, "status": s} for t, s in conditions]}}


def test_verdict_comes_only_from_true_finished_conditions_failed_first() -> None:
    recorded = [
        (None, "Pending"),
        ({}, "Pending"),
        (job_with(("Created", "True")), "Created"),
        (job_with(("Created", "True"), ("Running", "True")), "Running"),
        (job_with(("Created", "True"), ("Running", "False"), ("Restarting", "True")), "Restarting"),
        (job_with(("Created", "True"), ("Running", "False"), ("Succeeded", "True")), "Succeeded"),
        (job_with(("Created", "True"), ("Succeeded", "False")), "Created"),
        (job_with(("Running", "True"), ("Failed", "True")), "Failed"),
        (job_with(("Succeeded", "True"), ("Failed", "True")), "Failed"),  # Failed wins, whatever the order
        (job_with(("Failed", "True"), ("Succeeded", "True")), "Failed"),
        (job_with(("Running", "True"), ("Suspended", "True")), "Suspended"),
    ]
    assert [verdict(job) for job, _ in recorded] == [want for _, want in recorded]


def test_plan_creates_adopts_or_refuses() -> None:
    def hashed(spec_hash: str) -> dict[str, Any]:
        return {"metadata": {"name": "fit-cluster", "annotations": {"clusterfit.io/spec-hash": spec_hash}}}

    assert plan(None, hashed("abc")) == "create"
    assert plan(hashed("abc"), hashed("abc")) == "adopt"
    with pytest.raises(ControllerError, match="different spec.*delete it first"):
        plan(hashed("xyz"), hashed("abc"))


def test_dry_run_prints_the_manifests_without_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "ns1", "s3://bucket/x", "http://127.0.0.1:9")
    assert commands.cli_submit([f"config={config}", "--dry-run", "--kubeconfig", str(tmp_path / "none")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PyTorchJob"] == [f"fit-{s}" for s in ALL_STEPS]


# ---- against the API server ---------------------------------------------------------------------


def test_happy_path_creates_five_steps_in_order(ex: Experiment, caplog: pytest.LogCaptureFixture) -> None:
    config, cfg = ex.config()
    caplog.set_level(logging.INFO)
    with FakeKubelet(ex.cp) as kubelet, FakeOperator(ex, cfg, kubelet=kubelet) as operator:
        assert ex.submit(config) == 0

    names = [job_name(cfg, step) for step in ALL_STEPS]
    assert operator.names() == names  # each created once, in pipeline order
    for previous, job in zip(names, operator.created[1:], strict=False):
        assert int(job["metadata"]["resourceVersion"]) > operator.succeeded_rv[previous], (
            f"{job['metadata']['name']} too early"
        )
    name = build_config_map(cfg)["metadata"]["name"]  # fit-config-<digest>
    config_map = client.CoreV1Api(ex.cp.api_client()).read_namespaced_config_map(name, ex.namespace)
    assert config_map.immutable is True
    for step, job in zip(ALL_STEPS, operator.created, strict=True):
        assert f"clusterfit {step} {ARGS}" in container_args(job)
        assert job["metadata"]["ownerReferences"][0]["uid"] == config_map.metadata.uid
    (ex.folder / "shipped.yaml").write_text(config_map.data["config.yaml"])  # what the pods read
    assert config_from_args([f"config={ex.folder / 'shipped.yaml'}"]).EXPERIMENT.root_uri == f"{ex.root}/fit"
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    for step, name in zip(ALL_STEPS, names, strict=True):
        assert store.get_bytes(f"logs/{step}/{name}-master-0.log") == f"{step}: starting\n{step}: done\n".encode()
    assert "experiment fit: all steps done" in caplog.text


def test_failed_cluster_step_stops_the_pipeline_and_says_why(
    ex: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    config, cfg = ex.config()
    log = "".join(f"iteration {i}\n" for i in range(100)) + "RuntimeError: CUDA out of memory\n"
    failed = ("PyTorchJobFailed", "PyTorchJob fit-cluster is failed because 1 Master replica(s) failed.")
    with (
        FakeKubelet(ex.cp) as kubelet,
        FakeOperator(ex, cfg, {"cluster": Script(fail=failed, log=log)}, kubelet) as operator,
    ):
        assert ex.submit(config) == 1

    assert operator.names() == [job_name(cfg, s) for s in ("pretrain", "extract", "cluster")]  # nothing later
    err = capsys.readouterr().err
    for expected in [
        "step cluster failed: PyTorchJob fit-cluster: PyTorchJobFailed: PyTorchJob fit-cluster is failed because 1 "
        "Master",
        "pod fit-cluster-master-0 container pytorch: terminated OOMKilled (exit code 137)",
        "pod fit-cluster-worker-0: not scheduled: Unschedulable: 0/4 nodes are available",
        "pod fit-cluster-worker-1 container pytorch: ImagePullBackOff",
        "event on fit-cluster-master-0: OOMKilling: Memory cgroup out of memory",
        "event on fit-cluster-worker-0: FailedScheduling",
        "last 50 lines of pod fit-cluster-master-0:",
        "    RuntimeError: CUDA out of memory",
    ]:
        assert expected in err
    assert "iteration 50\n" not in err and "iteration 51\n" in err  # the tail, not the whole log
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    assert store.get_bytes("logs/cluster/fit-cluster-master-0.log").decode() == log


def test_start_problems_keep_their_key_while_a_pull_alternates_between_its_reasons() -> None:
    def pod(state: dict[str, Any], conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        status = {"containerStatuses": [container_status("x:1", state)], "conditions": conditions or []}
        return {"metadata": {"name": "p"}, "status": status}

    pulling = start_problems([pod({"waiting": {"reason": "ErrImagePull", "message": "no such host"}})])
    backing_off = start_problems([pod({"waiting": {"reason": "ImagePullBackOff", "message": "back-off"}})])
    assert list(pulling) == list(backing_off) == [("p", "pytorch")]
    assert backing_off[("p", "pytorch")] == "pod p container pytorch: ImagePullBackOff: back-off"
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}
    assert start_problems([pod({"waiting": {"reason": "ContainerCreating"}}, [unschedulable])]) == {
        ("p", "scheduling"): "pod p: Unschedulable: 0/1 nodes"
    }
    # Starting normally, running, crashed (the job's backoffLimit ends a crash loop): no start problem.
    for state in (
        {"waiting": {"reason": "ContainerCreating"}},
        {"running": {}},
        {"waiting": {"reason": "CrashLoopBackOff"}},
    ):
        assert start_problems([pod(state)]) == {}


def test_a_pod_that_cannot_start_fails_the_step_after_the_start_timeout(
    ex: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    config, cfg = ex.config(steps=["extract", "cluster"], POD_START_TIMEOUT_S=3, POD_CHECK_INTERVAL_S=1)
    message = 'Back-off pulling image "clusterfit/clusterfit:typo"'
    backoff = container_status(
        "clusterfit/clusterfit:typo", {"waiting": {"reason": "ImagePullBackOff", "message": message}}
    )
    stuck = Script(hold=threading.Event(), pod_status={"phase": "Pending", "containerStatuses": [backoff]})
    started = time.monotonic()
    with FakeOperator(ex, cfg, {"extract": stuck}) as operator:
        assert ex.submit(config) == 1
        waited_s = time.monotonic() - started
    # The job itself never failed (it would have waited for activeDeadlineSeconds): the controller did.
    assert 3 <= waited_s < 30, waited_s
    assert operator.names() == ["fit-extract"]  # no later step
    err = capsys.readouterr().err
    assert (
        "step extract failed: PyTorchJob fit-extract: pod fit-extract-master-0 container pytorch: ImagePullBackOff"
        in err
    )
    assert message in err and "POD_START_TIMEOUT_S=3" in err


def test_the_log_and_reason_of_a_crashed_pod_survive_its_deletion(
    ex: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    config, cfg = ex.config(steps=["cluster", "train"], POD_CHECK_INTERVAL_S=1)
    log = "".join(f"assigning part {i}\n" for i in range(80)) + "Killed\n"
    restarted = oom_restarted()
    failed = ("PyTorchJobFailed", "PyTorchJob fit-cluster is failed because 1 Master replica(s) failed.")
    crash = Script(
        fail=failed,
        hold=threading.Event(),
        log=log,
        pod_status={"phase": "Running", "containerStatuses": [restarted]},
        delete_pods=True,  # the operator's cleanPodPolicy Running: the log would be gone with the pod
    )
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    saved = "logs/cluster/fit-cluster-master-0.log"
    with FakeKubelet(ex.cp) as kubelet, FakeOperator(ex, cfg, {"cluster": crash}, kubelet) as operator:
        thread, result = ex.submit_in_background(config)
        wait_for(lambda: store.exists(saved))  # seen while the job still ran
        assert crash.hold is not None
        crash.hold.set()
        thread.join(timeout=60)
        # The controller stops the step on seeing OOMKilled (kube/status.py retry_problem), before the job
        # fails: let the operator fail it and delete its pod, as cleanPodPolicy Running does.
        wait_for(lambda: not operator.core.list_namespaced_pod(ex.namespace).items)
    assert result == [1]
    assert operator.names() == ["fit-cluster"]
    err = capsys.readouterr().err
    assert "pod fit-cluster-master-0 container pytorch: terminated OOMKilled (exit code 137)" in err
    assert "last 50 lines of pod fit-cluster-master-0:" in err and "    Killed" in err
    assert store.get_bytes(saved).decode() == log
    # `clusterfit logs` finds the saved log although the pod is gone.
    assert commands.cli_logs([f"config={config}", "--kubeconfig", str(ex.cp.kubeconfig_path), "cluster"]) == 0
    assert capsys.readouterr().out.endswith("Killed\n")


def test_killed_controller_restarts_adopts_the_running_job_and_finishes(ex: Experiment) -> None:
    config, cfg = ex.config()
    hold = threading.Event()
    scripts = {"cluster": Script(hold=hold)}
    command = ex.submit_command(config)
    with FakeOperator(ex, cfg, scripts) as operator:
        first = start_submit(command, ex)
        assert scripts["cluster"].running.wait(timeout=60), "the cluster step never started"
        first.send_signal(signal.SIGKILL)  # mid-pipeline, while it follows the Running cluster job
        first.wait(timeout=10)
        second = start_submit(command, ex)
        err = read_until(second, "whose process is no longer running on this machine")  # its Lease: at once
        err += read_until(second, "adopted the existing PyTorchJob fit-cluster")  # before the step ends
        hold.set()
        err += second.communicate(timeout=60)[1]

    assert first.returncode == -signal.SIGKILL
    assert second.returncode == 0, err
    assert operator.names() == [job_name(cfg, step) for step in ALL_STEPS]  # no duplicate: one uid per name
    assert "step pretrain: already done" in err and "step extract: already done" in err
    assert len(ex.jobs()) == 5


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
def test_watch_cut_by_an_apiserver_restart_still_reaches_the_verdict(
    ex: Experiment, graceful: bool, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    config, cfg = ex.config(steps=["extract", "cluster"])
    hold = threading.Event()
    scripts = {"extract": Script(hold=hold), "cluster": Script(fail=("PyTorchJobFailed", "after the restart"))}
    caplog.set_level(logging.INFO)
    with FakeOperator(ex, cfg, scripts) as operator:
        thread, result = ex.submit_in_background(config)
        wait_for(lambda: "PyTorchJob fit-extract: Running" in caplog.text)  # it follows the Running job
        time.sleep(0.2)
        ex.cp.restart_apiserver(graceful=graceful)
        hold.set()  # Succeeded is patched after the restart: only a new watch or list can see it
        thread.join(timeout=60)

    assert result == [1]  # the cluster step's Failed verdict, reached after the cut
    assert operator.names() == ["fit-extract", "fit-cluster"]
    assert "PyTorchJob fit-extract: Succeeded" in caplog.text
    assert "step cluster failed: PyTorchJob fit-cluster: PyTorchJobFailed: after the restart" in capsys.readouterr().err
    cut = "PyTorchJob fit-extract: the watch ended after" if graceful else "watch pytorchjobs: the connection to"
    assert cut in caplog.text  # the cut was seen, and survived


def test_watch_from_a_too_old_resource_version_gets_410_and_lists_again(
    ex: Experiment, caplog: pytest.LogCaptureFixture
) -> None:
    class StaleFirstWatch(Kube):  # as after a long disconnect: the server answers 410 Gone
        stale = True

        def watch_job(self, name: str, resource_version: str, timeout_s: int | None = None) -> Any:
            resource_version, StaleFirstWatch.stale = ("1" if self.stale else resource_version), False
            return super().watch_job(name, resource_version, timeout_s)

    _, cfg = ex.config(steps=["extract"])
    caplog.set_level(logging.INFO)
    kube = StaleFirstWatch(ex.cp.api_client(), ex.namespace, cfg.KUBERNETES.CONTROLLER)
    with FakeOperator(ex, cfg, {"extract": Script(hold=(hold := threading.Event()))}):
        thread = threading.Thread(
            target=Controller(
                cfg, kube, open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE), config_map_name="c", owner=None
            ).run,
            daemon=True,
        )
        thread.start()
        wait_for(lambda: "410 Gone" in caplog.text)  # while the job still runs
        hold.set()
        thread.join(timeout=30)
    assert "PyTorchJob fit-extract: watch expired (410 Gone); listing again" in caplog.text
    assert "step extract: Succeeded" in caplog.text


def test_the_controller_role_is_exactly_what_the_chart_controller_calls(
    ex: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    assert normalized_rules(committed_role_rules("controller")) == EXPECTED_RULES["controller"]
    as_controller = grant_controller_role(ex.cp, ex.namespace)
    config, cfg = ex.config(steps=["extract", "cluster"], LEASE_DURATION_S=3, POD_CHECK_INTERVAL_S=1)
    owner = client.CoreV1Api(ex.cp.api_client()).create_namespaced_config_map(
        ex.namespace, build_config_map(cfg, "fit-release")
    )
    # A step that runs past a Lease renewal, then one whose container is OOMKilled: the controller reads its
    # crashed log and the events, and suspends the job (the operator would recreate the pod until the deadline).
    slow = Script(hold=threading.Event())
    restarted = oom_restarted()
    killed = Script(
        hold=threading.Event(), log="cluster: boom\n", pod_status={"phase": "Running", "containerStatuses": [restarted]}
    )
    with FakeKubelet(ex.cp) as kubelet, FakeOperator(ex, cfg, {"extract": slow, "cluster": killed}, kubelet):
        threading.Timer(2.5, slow.hold.set).start()  # type: ignore[union-attr]
        assert ex.submit(config, "--owner-configmap", "fit-release", kubeconfig=as_controller) == 1  # as the chart's
    assert [j["metadata"]["ownerReferences"][0]["uid"] for j in ex.jobs()] == [owner.metadata.uid] * 2
    err = capsys.readouterr().err
    assert "cluster: boom" in err and "PyTorchJob fit-cluster is suspended (no more retries)" in err
    assert {j["metadata"]["name"] for j in ex.jobs() if j["spec"]["runPolicy"].get("suspend")} == {"fit-cluster"}
    # A later submit does not adopt the suspended job (it would wait for it forever): it says what to do.
    assert ex.submit(config, "--owner-configmap", "fit-release", kubeconfig=as_controller) == 1
    assert "PyTorchJob fit-cluster is suspended" in capsys.readouterr().err
    used, refused = used_rules(ex.cp, "controller")
    print(f"RBAC | controller used {sorted((r, sorted(v)) for r, v in used.items())}")
    assert refused == []
    assert used == EXPECTED_RULES["controller"]  # every verb it is granted, and nothing else

    other, _ = ex.config(name="other")  # its ConfigMap must be created: not in the Role
    assert ex.submit(other, kubeconfig=as_controller) == 1
    err = capsys.readouterr().err
    assert f"forbidden: cannot create configmaps in namespace '{ex.namespace}'" in err
    assert 'User "clusterfit-controller" cannot create resource "configmaps"' in err  # the server's own words
    assert len(ex.jobs()) == 2


def test_the_user_role_is_exactly_what_submit_status_logs_and_cancel_call(
    ex: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    assert normalized_rules(committed_role_rules("user")) == EXPECTED_RULES["user"]
    as_user = grant_controller_role(ex.cp, ex.namespace, "user")
    config, cfg = ex.config(steps=["extract", "cluster"], LEASE_DURATION_S=3, POD_CHECK_INTERVAL_S=1)
    # A Helm release's controller Job of this experiment, for cancel to stop.
    release = {
        "metadata": {"name": "fit-1a2b3c4d", "labels": {"clusterfit.io/experiment": "fit"}},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "controller", "image": "controller:0"}]}
            }
        },
    }
    client.BatchV1Api(ex.cp.api_client()).create_namespaced_job(ex.namespace, release)
    argv = [f"config={config}", "--kubeconfig", str(as_user)]
    hold = threading.Event()
    failed = Script(hold=hold, fail=("PyTorchJobFailed", "PyTorchJob fit-cluster is failed."), log="cluster: boom\n")
    with FakeKubelet(ex.cp) as kubelet, FakeOperator(ex, cfg, {"cluster": failed}, kubelet):
        thread, result = ex.submit_in_background(config, kubeconfig=as_user)
        assert failed.running.wait(timeout=60)
        assert commands.cli_cancel([*argv, "cluster", "--suspend"]) == 0
        time.sleep(1.5)  # past a Lease renewal
        hold.set()
        thread.join(timeout=60)
        assert result == [1]
        assert commands.cli_status(argv) == 0
        assert commands.cli_logs([*argv, "cluster"]) == 0
        assert commands.cli_cancel(argv) == 0
    out = capsys.readouterr().out
    assert "suspended PyTorchJob fit-cluster (was Running)" in out and "cluster: boom" in out
    assert "suspended the controller Job fit-1a2b3c4d" in out and "deleted PyTorchJob fit-cluster (was Failed)" in out
    used, refused = used_rules(ex.cp, "user")
    print(f"RBAC | user used {sorted((r, sorted(v)) for r, v in used.items())}")
    assert refused == []
    assert used == EXPECTED_RULES["user"]


def test_server_dry_run_validates_and_rejects_with_the_servers_message(
    ex: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    config, cfg = ex.config()
    assert ex.submit(config, "--server-dry-run") == 0
    assert capsys.readouterr().out.count("valid (server dry run)") == 5

    bad = cfg.model_dump(mode="json")
    term = {"matchExpressions": [{"key": "gpu", "operator": "In", "values": "a100"}]}  # values must be a list
    bad["KUBERNETES"]["AFFINITY"] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    }
    (ex.folder / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert ex.submit(ex.folder / "bad.yaml", "--server-dry-run") == 1
    err = capsys.readouterr().err
    assert "pytorchjob/fit-extract rejected by the API server: create pytorchjobs:" in err
    assert 'PyTorchJob.kubeflow.org "fit-extract" is invalid' in err
    assert "nodeSelectorTerms[0].matchExpressions[0].values: Invalid value" in err
    assert ex.jobs() == []  # a dry run creates nothing


def test_refuses_a_different_job_and_reports_one_that_vanished(
    ex: Experiment, capsys: pytest.CaptureFixture[str]
) -> None:
    config, cfg = ex.config(steps=["extract"])
    admin_jobs = client.CustomObjectsApi(ex.cp.api_client())
    stranger = commands.build_all(cfg, config_map_name="fit-config")[1]
    stranger["metadata"]["annotations"]["clusterfit.io/spec-hash"] = "someone-elses"
    admin_jobs.create_namespaced_custom_object(GROUP, VERSION, ex.namespace, PLURAL, stranger)
    assert ex.submit(config) == 1
    assert "already exists with a different spec" in capsys.readouterr().err
    admin_jobs.delete_namespaced_custom_object(GROUP, VERSION, ex.namespace, PLURAL, "fit-extract")

    with FakeOperator(ex, cfg, {"extract": Script(hold=threading.Event())}) as operator:
        thread, result = ex.submit_in_background(config)
        assert operator.scripts["extract"].running.wait(timeout=30)
        admin_jobs.delete_namespaced_custom_object(GROUP, VERSION, ex.namespace, PLURAL, "fit-extract")  # TTL, say
        thread.join(timeout=30)
    assert result == [1]
    assert "PyTorchJob fit-extract was deleted before it finished" in capsys.readouterr().err


def test_a_resubmit_reruns_from_the_first_step_whose_keys_changed_and_skips_the_rest(
    ex: Experiment, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    config, cfg = ex.config(steps=["extract", "cluster", "train", "evaluate"])
    base = [f"config={config}", "--kubeconfig", str(ex.cp.kubeconfig_path)]
    caplog.set_level(logging.INFO)
    with FakeOperator(ex, cfg) as operator:
        assert ex.submit(config) == 0
        tree = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump(tree | {"LOG": {"PROGRESS_INTERVAL_S": 5.0}}))  # how it runs, not what
        capsys.readouterr()
        assert ex.submit(config) == 0
        assert "experiment fit: all steps done" in caplog.text
        assert operator.names() == ["fit-extract", "fit-cluster", "fit-train", "fit-evaluate"]  # nothing rerun

        config.write_text(yaml.safe_dump(tree | {"EVALUATE": {"LINEAR_EPOCHS": 3}}))  # a key only evaluate reads
        assert commands.cli_status(base) == 0
        table = capsys.readouterr().out.splitlines()
        assert [line.split()[3] for line in table[1:]] == ["published", "published", "published", "outdated"]
        assert ex.submit(config) == 1  # its finished job has the old config's spec: the workstation deletes it
        assert "a PyTorchJob named fit-evaluate already exists with a different spec" in capsys.readouterr().err
        assert commands.cli_cancel([*base, "evaluate"]) == 0
        caplog.clear()
        operator.cfg = config_from_args([f"config={config}"])  # the step publishes with the config it ran
        assert ex.submit(config) == 0
        for step in ("extract", "cluster", "train"):
            assert f"step {step}: already done with this config" in caplog.text
        assert "step evaluate: published before EVALUATE.LINEAR_EPOCHS changed" in caplog.text
        assert ex.submit(config) == 0  # and now it is done with this config

    assert operator.names()[4:] == ["fit-evaluate"]  # evaluate alone, once


def test_status_logs_and_cancel(ex: Experiment, capsys: pytest.CaptureFixture[str]) -> None:
    config, cfg = ex.config(steps=["extract", "cluster"])
    base = [f"config={config}", "--kubeconfig", str(ex.cp.kubeconfig_path)]
    scripts = {"cluster": Script(hold=threading.Event(), log="k-means iteration 1\nk-means iteration 2\n")}
    with FakeKubelet(ex.cp) as kubelet, FakeOperator(ex, cfg, scripts, kubelet):
        thread, result = ex.submit_in_background(config, "--namespace", ex.namespace)
        assert scripts["cluster"].running.wait(timeout=30)
        capsys.readouterr()
        assert commands.cli_status(base) == 0
        table = capsys.readouterr().out
        assert "extract   fit-extract" in table and "Succeeded" in table and "published" in table
        assert "cluster   fit-cluster" in table and "Running" in table
        assert commands.cli_logs([*base, "cluster", "--follow"]) == 0
        assert capsys.readouterr().out == "k-means iteration 1\nk-means iteration 2\n"
        assert commands.cli_logs([*base, "extract"]) == 0
        assert capsys.readouterr().out == "extract: starting\nextract: done\n"
        assert commands.cli_cancel([*base, "--suspend"]) == 0
        assert "suspended PyTorchJob fit-cluster (was Running)" in capsys.readouterr().out
        got = client.CustomObjectsApi(ex.cp.api_client()).get_namespaced_custom_object(
            GROUP, VERSION, ex.namespace, PLURAL, "fit-cluster"
        )
        assert got["spec"]["runPolicy"]["suspend"] is True
        assert commands.cli_cancel(base) == 0
        assert "deleted PyTorchJob fit-cluster" in capsys.readouterr().out
        thread.join(timeout=30)
    assert result == [1]  # the controller saw its job deleted: lost, not succeeded
    assert [j["metadata"]["name"] for j in ex.jobs()] == ["fit-extract"]


class InterruptedInsideALibrary:
    """A controller whose Ctrl-C lands in library code that turns the KeyboardInterrupt into an error of its own, as
    pydantic does while it builds the kubernetes client's validators (CI saw a SchemaError there)."""

    current = "fit-extract"

    def run(self) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal handler runs here
        except KeyboardInterrupt as exc:
            raise RuntimeError("SchemaError: Error building 'call' validator: KeyboardInterrupt") from exc


class FailingController:
    current = "fit-extract"

    def run(self) -> None:
        raise RuntimeError("a real error")


def test_ctrl_c_inside_a_library_is_still_ctrl_c_and_other_errors_are_not(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT)
    assert commands.follow_pipeline(InterruptedInsideALibrary(), None) == 130  # type: ignore[arg-type]
    assert "detached: PyTorchJob fit-extract keeps running" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="a real error"):  # without Ctrl-C an error stays an error
        commands.follow_pipeline(FailingController(), None)  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_detaches_without_a_terminal_and_asks_on_one(ex: Experiment) -> None:
    config, cfg = ex.config(steps=["extract"])
    command = ex.submit_command(config)
    with FakeOperator(ex, cfg, {"extract": Script(hold=threading.Event())}):
        detached = start_submit(command, ex)
        read_until(detached, "PyTorchJob fit-extract: Running")
        detached.send_signal(signal.SIGINT)
        err = detached.communicate(timeout=30)[1]
        assert detached.returncode == 130 and "detached: PyTorchJob fit-extract keeps running" in err, err
        assert [j["metadata"]["name"] for j in ex.jobs()] == ["fit-extract"]

        terminal, tty = pty.openpty()  # stdin is a terminal: Ctrl-C asks, and "c" cancels
        asked = start_submit(command, ex, stdin=tty)
        read_until(asked, "PyTorchJob fit-extract: Running")  # adopted, followed
        asked.send_signal(signal.SIGINT)
        os.write(terminal, b"c\n")
        err = asked.communicate(timeout=30)[1]
        os.close(terminal)
        os.close(tty)
    assert asked.returncode == 130 and "cancelled: deleted PyTorchJob fit-extract" in err, err
    assert ex.jobs() == []
