"""Which jobs `clusterfit submit` adopts, against the real API server: those `clusterfit render` +
`kubectl apply` created, and a running one whose config changed only in keys its step does not read;
every config is its own immutable, content-addressed ConfigMap, so a job keeps reading its own."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from clusterfit.config import config_from_args
from clusterfit.kube.manifests import CONFIG_VOLUME, build_config_map
from tests.infra.controlplane import ControlPlane, find_binary
from tests.kube.helpers_controller import Experiment, FakeOperator, Script
from tests.kube.helpers_manifests import render
from tests.kube.test_controller import read_until, start_submit
from tests.s3server import S3Server


@pytest.fixture
def ex(control_plane: ControlPlane, namespace: str, s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> Experiment:
    return Experiment(control_plane, namespace, tmp_path, f"{s3_bucket}/runs", s3_env.endpoint_url)


def edited(config: Path, name: str, **keys: Any) -> Path:
    """A copy of the config file with dotted keys set."""
    tree = yaml.safe_load(config.read_text())
    for dotted, value in keys.items():
        *parents, last = dotted.split("__")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = config.with_name(name)
    path.write_text(yaml.safe_dump(tree))
    return path


def mounted_config_map(job: dict[str, Any]) -> str:
    volumes = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    return next(v["configMap"]["name"] for v in volumes if v["name"] == CONFIG_VOLUME)


def config_maps(ex: Experiment) -> list[str]:
    items = client.CoreV1Api(ex.cp.api_client()).list_namespaced_config_map(ex.namespace).items
    return sorted(c.metadata.name for c in items if c.metadata.name.startswith("fit-config-"))


def test_jobs_applied_from_a_render_are_adopted_by_submit(ex: Experiment, caplog: pytest.LogCaptureFixture) -> None:
    config, cfg = ex.config(steps=["extract", "cluster"])
    objects = render([f"config={config}"], ex.folder / "rendered")
    assert objects[0]["kind"] == "ConfigMap" and objects[0]["immutable"] is True
    hold = threading.Event()
    kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(ex.cp.kubeconfig_path), "apply", "-f"]
    with FakeOperator(ex, cfg, {"extract": Script(hold=hold)}) as operator:
        for path in sorted((ex.folder / "rendered").glob("0[01]-*.yaml")):  # the ConfigMap and the first job
            applied = subprocess.run([*kubectl, str(path)], capture_output=True, text=True, timeout=60)
            assert applied.returncode == 0, applied.stderr
        assert operator.scripts["extract"].running.wait(timeout=60)
        caplog.set_level(logging.INFO)
        thread, result = ex.submit_in_background(config)
        deadline = time.monotonic() + 60
        while "adopted the existing" not in caplog.text and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        hold.set()
        thread.join(timeout=60)
    assert result == [0], caplog.text
    assert "adopted the existing PyTorchJob fit-extract (same spec)" in caplog.text
    assert operator.names() == ["fit-extract", "fit-cluster"]  # one job per step: nothing replaced
    jobs = {j["metadata"]["name"]: j for j in ex.jobs()}
    # The applied ConfigMap is the one submit uses: the same config names the same ConfigMap.
    assert mounted_config_map(jobs["fit-cluster"]) == objects[0]["metadata"]["name"] == config_maps(ex)[0]
    assert len(config_maps(ex)) == 1


def test_an_edit_the_running_step_does_not_read_keeps_its_job_one_it_reads_is_refused(ex: Experiment) -> None:
    config, cfg = ex.config(steps=["train", "evaluate"])
    hold = threading.Event()
    with FakeOperator(ex, cfg, {"train": Script(hold=hold)}) as operator:
        first = start_submit(ex.submit_command(config), ex)
        assert operator.scripts["train"].running.wait(timeout=60), "the train step never started"
        first.send_signal(signal.SIGKILL)  # the controller dies while train runs
        first.wait(timeout=10)
        (old_config_map,) = config_maps(ex)

        # OPTIMIZER.BASE_LR is read by train: its job is another job, and the running one is not replaced.
        lr = edited(config, "lr.yaml", OPTIMIZER__BASE_LR=0.3)
        refused = subprocess.run(ex.submit_command(lr), capture_output=True, text=True, timeout=120, cwd=ex.folder)
        assert refused.returncode == 1, refused.stderr
        assert "a PyTorchJob named fit-train already exists with a different spec" in refused.stderr

        # EVALUATE.PROTOCOL is not: the running train job is adopted, evaluate reads the new config.
        protocol = edited(config, "protocol.yaml", EVALUATE__PROTOCOL="vissl_linear")
        second = start_submit(ex.submit_command(protocol), ex)
        err = read_until(second, "adopted the existing PyTorchJob fit-train")
        hold.set()
        err += second.communicate(timeout=120)[1]
    assert second.returncode == 0, err
    assert operator.names() == ["fit-train", "fit-evaluate"]
    new_config_map = build_config_map(config_from_args([f"config={protocol}"]))["metadata"]["name"]
    jobs = {j["metadata"]["name"]: j for j in ex.jobs()}
    assert mounted_config_map(jobs["fit-train"]) == old_config_map  # a restarted train pod reads its own config
    assert mounted_config_map(jobs["fit-evaluate"]) == new_config_map != old_config_map
    assert config_maps(ex) == sorted([old_config_map, new_config_map])
    stored = client.CoreV1Api(ex.cp.api_client()).read_namespaced_config_map(new_config_map, ex.namespace)
    assert stored.immutable is True and "vissl_linear" in stored.data["config.yaml"]
